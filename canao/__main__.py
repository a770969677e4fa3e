import sys

from canao.cli import main

sys.exit(main())
