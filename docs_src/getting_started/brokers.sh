rabbitmqctl list_queues name messages consumers   # command queues, their .dlq and the delay queues
redis-cli XREVRANGE events + - COUNT 5            # the latest outcome events on Redis (header event-type)
redis-cli XINFO GROUPS email                      # the consumer group: pending entries and lag
curl -s localhost:8000/health/ready               # {"status": "healthy", "checks": {...}}
