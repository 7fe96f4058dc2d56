import os
import signal

# Ctrl-C before the command line is imported: nothing is written yet; exit as cli.py's handler would.
signal.signal(signal.SIGINT, lambda signum, frame: (os.write(2, b"interrupted: no output written\n"), os._exit(130)))

from .cli import main  # noqa: E402  (after the handler: importing takes a noticeable moment)

main(prog_name="sdport")
