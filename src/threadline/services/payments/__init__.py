"""payments: sandbox payment methods, subscriptions, tips, the ledger and idempotency records."""
