from snapbench.cli import main

raise SystemExit(main())
