from hpcgan.cli import main

raise SystemExit(main())
