.venv/bin/pipeline events --follow                   # every event the worker records, as it records it
.venv/bin/pipeline events --type email.sent --json   # one JSON object per line, data and metadata
.venv/bin/pipeline tasks show TASK_ID --history      # a completion task and its events
.venv/bin/pipeline dlq list                          # what was dead-lettered, why, after how many attempts
