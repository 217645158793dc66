"""A real MCP client (the official Python SDK, PyPI `mcp`) for the end-to-end test: connects
to URL with a bearer token, and prints one JSON line per step: the tools it lists, then the
result of each tool call given as NAME=JSON-ARGUMENTS. A connection the gateway refuses
prints {"refused_with": JSON-RPC CODE, "message": ...} (the SDK reads the gateway's error
body) or {"refused": STATUS, "www_authenticate": ...}.

usage: client.py URL TOKEN [NAME=JSON-ARGUMENTS ...]
"""

import asyncio
import json
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


def refusal(error: BaseException):
    """The HTTP status and challenge behind a refused connection, if that is what it was."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = refusal(inner)
            if found:
                return found
        return None
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", 0) >= 400:
        return {"refused": response.status_code, "www_authenticate": response.headers.get("www-authenticate")}
    code = getattr(getattr(error, "error", None), "code", None)
    if code is not None:
        # The gateway's JSON-RPC error body, which the SDK reads from the refused response.
        return {"refused_with": code, "message": str(error)}
    if error.__cause__ is not None:
        return refusal(error.__cause__)
    return None


async def main(url: str, token: str, calls: list[str]) -> None:
    headers = {"authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=20) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                print(json.dumps({"tools": sorted(tool.name for tool in listed.tools)}), flush=True)
                for call in calls:
                    name, arguments = call.split("=", 1)
                    try:
                        result = await session.call_tool(name, json.loads(arguments))
                    except Exception as error:  # noqa: BLE001 - an MCP error is a result here
                        code = getattr(getattr(error, "error", None), "code", None)
                        print(json.dumps({"tool": name, "error": str(error), "code": code}), flush=True)
                        continue
                    text = " ".join(getattr(part, "text", "") for part in result.content)
                    print(json.dumps({"tool": name, "is_error": result.is_error, "text": text}), flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
    except BaseException as error:  # noqa: BLE001 - report what a refused client sees
        found = refusal(error)
        if not found:
            raise
        print(json.dumps(found), flush=True)
