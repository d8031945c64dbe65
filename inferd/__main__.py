"""``python -m inferd`` runs the daemon, like the ``inferd`` command."""

from inferd.daemon import main

main()
