from kd.app.cli import main

raise SystemExit(main())
