"""Allow ``python -m smartgas_publisher``."""

from smartgas_publisher.cli import main

raise SystemExit(main())
