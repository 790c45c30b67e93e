"""Launching a container to trace, for the docker_events source.

* ``options``: the ``launch`` table of a pipeline file;
* ``seccomp``: the log-everything seccomp profile and the ``seccomp`` choice;
* ``create``: the Docker Engine API body that creates the container;
* ``docker_state``: signal numbers, and the facts SPEAKER reads from
  ``docker inspect`` and from Docker events.
"""
