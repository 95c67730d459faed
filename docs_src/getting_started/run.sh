make run      # creates .venv from the lock, then: faststream run streams.app:app --host 0.0.0.0 --port 8000
