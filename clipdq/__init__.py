"""clipdq: check product catalogs against their own images."""

import logging

# Long work reports its progress here, each record with ``extra={"progress": (done, total)}``:
# a log line each by default; the CLI draws them as one bar on a terminal.
progress_log = logging.getLogger("clipdq.progress")
