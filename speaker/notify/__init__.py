"""Seccomp user notification: the parts of enforcement that are not components.

* ``ioctl`` calls the kernel's SECCOMP_IOCTL_NOTIF_* interface on a listener fd.
* ``handoff`` receives that fd from the OCI runtime over a unix socket, and
  ``oci`` parses the state that comes with it.
* ``policy`` decides a notified syscall from the container's current phase.
* ``responder`` responds to one listener fd's notifications from its own
  thread, and ``holds`` keeps the notifications that wait for a phase change.
* ``watchdog`` denies what a stalled supervisor leaves waiting, reading
  ``slots``.
* ``agent`` runs all of these; ``delivery`` tells how runc finds the socket.
* ``supervisor`` ties them to the pipeline, for the ``supervisor`` stage and
  the ``enforce`` stage's notify back end.
"""
