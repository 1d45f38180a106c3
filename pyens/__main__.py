from pyens.cli import main

raise SystemExit(main())
