from pocketlm.cli import main

raise SystemExit(main())
