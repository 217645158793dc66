"""A real MCP server (the official Python SDK, PyPI `mcp`) for the end-to-end test: three
invoice tools over Streamable HTTP at /mcp. Every tool call it executes is appended to the
file named by CALLS, so the test can tell what reached the server.

usage: server.py PORT CALLS
"""

import json
import sys

from mcp.server.mcpserver import MCPServer

PORT, CALLS = int(sys.argv[1]), sys.argv[2]
app = MCPServer("invoices")


def record(tool: str, **arguments) -> None:
    with open(CALLS, "a", encoding="utf-8") as calls:
        calls.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


@app.tool()
def get_invoice(invoice_id: str) -> str:
    """Reads one invoice."""
    record("get_invoice", invoice_id=invoice_id)
    return f"invoice {invoice_id}: 120 EUR, open"


@app.tool()
def pay_invoice(invoice_id: str, amount: int) -> str:
    """Pays an invoice."""
    record("pay_invoice", invoice_id=invoice_id, amount=amount)
    return f"paid {amount} on invoice {invoice_id}"


@app.tool()
def delete_all_invoices() -> str:
    """Deletes every invoice."""
    record("delete_all_invoices")
    return "deleted"


app.run("streamable-http", host="127.0.0.1", port=PORT)
