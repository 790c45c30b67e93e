"""SPEAKER: per-phase syscall profiles for containers, traced and enforced.

The public pieces for writing components are in ``speaker.component``
(Source, Stage, Sink), ``speaker.options`` (option, Duration, ByteSize) and
``speaker.events``.
"""

__version__ = "0.1.0"
