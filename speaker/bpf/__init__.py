"""The bpftrace program of the ``ebpf`` source and the code around it.

``syscall_counts.bt`` is the program template, ``program`` renders it and
checks the host, ``output`` parses bpftrace's JSON output, and ``cgroups``
maps cgroup ids to container ids.
"""
