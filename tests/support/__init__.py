"""What the tests share, one place per concern (tests/ is on ``sys.path``, so ``support.*``):

* :mod:`support.fake_backend`  the one async fake backend (``FakeBackend``, its factory
  ``FakeBackendFactory``), with both texts: the successor chain and the echoed words;
* :mod:`support.settings`      the one settings builder (``make_settings``);
* :mod:`support.server`        starting the pool: in memory with quart's test client
  (``start_pool`` → ``Pool``) or over a socket on 127.0.0.1:0 (``start_server``,
  ``running_server``, ``server_in_thread``);
* :mod:`support.replies`       replies as read (``Reply``, ``StreamReply``), the exact error
  shape (``assert_error``) and wire constants;
* :mod:`support.sse`           the one SSE reader (``parse_responses_sse``, ``parse_chat_sse``);
* :mod:`support.runtime`       driving a ``PoolManager`` in-process (``running_manager``,
  ``request``, ``submit``, ``collect``, ``run``);
* :mod:`support.upstream`      a real fake OpenAI-compatible upstream (h11 on trio).
* :mod:`support.server_process` a real ``llm-pool serve`` subprocess's JSON log, and waiting
  for one of its lines (``ServerLog``).

Shared fixtures are in tests/conftest.py.  Helpers that one suite alone uses stay beside it
(``tests/<suite>/*_kit.py``); the fake ``exllamav3`` package and the tiny model writers stay in
tests/fakes and tests/models.
"""
