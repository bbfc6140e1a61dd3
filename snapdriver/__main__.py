from snapdriver.cli import main

raise SystemExit(main())
