"""Compare extraction methods on generation and A/B tasks at equal pairs and side-effect budget."""
