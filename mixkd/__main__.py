import sys

from mixkd.cli import main

sys.exit(main())
