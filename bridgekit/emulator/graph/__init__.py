"""The emulator's Microsoft Graph v1.0: routes (api) and query options, paging and delta tokens (query)."""
