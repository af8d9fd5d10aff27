import sys

from trading_pipeline.migrations import main

sys.exit(main(sys.argv[1:]))
