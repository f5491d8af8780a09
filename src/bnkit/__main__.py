from bnkit.cli import main

raise SystemExit(main())
