import sys

from graphlora.cli import main

sys.exit(main())
