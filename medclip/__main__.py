from medclip.cli import main

raise SystemExit(main())
