"""The customer-service assistant: scope, sentiment, FAQ retrieval, reply generation and escalation."""
