import sys

from carso.cli import main

sys.exit(main())
