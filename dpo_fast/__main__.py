import sys

from dpo_fast.cli import main

sys.exit(main())
