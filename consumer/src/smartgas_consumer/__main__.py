"""Allow ``python -m smartgas_consumer``."""

from smartgas_consumer.cli import main

raise SystemExit(main())
