"""The HTTP gateway: the OpenAI API, health and readiness probes and Prometheus metrics, in front of
the broker (docs/gateway.md). A child of the supervisor when the config has a [gateway] table."""
