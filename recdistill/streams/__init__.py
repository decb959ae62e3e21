"""Streams of the streaming phase (DESIGN §4 'Streams'): the interface and schemas (base), the local and redis
backends, a local redis-server for tests and the demo (server), and the sample/teacher-signal joiner (joiner)."""
