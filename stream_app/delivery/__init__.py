"""``stream-app deliver``: triggers relayed to HTTPS webhooks, for notification services that
do not consume Kafka. Pure policy in :mod:`.policy`; the consumer and HTTP in :mod:`.relay`."""
