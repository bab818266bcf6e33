"""`python -m cni.install`: the same as `mesh-cni install`."""

from cni.install import main

raise SystemExit(main())
