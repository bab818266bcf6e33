import sys

from proxyagent.agent import main

sys.exit(main())
