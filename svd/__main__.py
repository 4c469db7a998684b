from svd.cli import main

raise SystemExit(main())
