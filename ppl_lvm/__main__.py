import sys

from ppl_lvm.cli import main

sys.exit(main())
