.venv/bin/pipeline send email --to ada@example.com --subject "Welcome" --body "Hello Ada"
.venv/bin/pipeline send completion --prompt "Say hi" --broker redis
