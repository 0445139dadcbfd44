"""One model's engine over time: the controller that alone writes its state, the engine's own HTTP
calls (readiness, sleep, wake) and the backoff between failed starts."""
