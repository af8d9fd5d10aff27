"""The parts of the `openai` analyst (adapters/openai_analyst.py), one job each:

- settings.py: the OPENAI_* and TRADING_LLM_* variables, read and checked;
- request.py: what is sent: the numeric context, the chart image, the request body;
- transport.py: the HTTP client, sending, backoff, what the server accepts and what its errors mean;
- json_text.py: the one JSON value in a model's text, read strictly;
- answers.py: the answers the model must give, read from a chat completion and validated;
- calls.py: one model call with its cache, budget, retries and `llm_calls` accounting.
"""
