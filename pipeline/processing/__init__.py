"""Processing: the signals projection and its status rules, and durable consumers."""
