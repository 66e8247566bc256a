from ckpt_agent.cli import main

raise SystemExit(main())
