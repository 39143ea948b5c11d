"""Jobs: plain job data, a fair queue with owners, executors, durable history."""
