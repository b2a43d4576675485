"""`python -m engine` = `kiln`."""
import sys

from engine.cli.kiln import main

sys.exit(main())
