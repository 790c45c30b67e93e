import sys

try:
    from speaker.cli import exit_main
except KeyboardInterrupt:
    # Ctrl-C while the modules load: nothing has started yet.
    sys.exit(130)

exit_main()
