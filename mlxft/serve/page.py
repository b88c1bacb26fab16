"""The chat page `mlxft serve` shows at `/`: one self-contained HTML file with inline CSS and JS.

It talks to the server's own /v1/chat/completions with stream=true and reads the server-sent
events through fetch + ReadableStream, so the answer appears token by token. The instruction and
input boxes follow the Alpaca layout (the input travels as the request's `input` field); earlier
turns are sent as history. Kept in a .py file because a wheel carries Python modules without any
packaging configuration, while a loose .html file would need package-data settings.
"""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlxft chat</title>
<style>
  :root { --accent: #2d6cdf; --muted: #667085; --line: #d0d5dd; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #101828; background: #f2f4f7; }
  header { background: #101828; color: #fff; padding: 10px 18px; display: flex; gap: 12px; align-items: baseline; }
  header h1 { font-size: 17px; margin: 0; }
  header span { color: #98a2b3; font-size: 13px; }
  main { max-width: 860px; margin: 0 auto; padding: 14px; display: grid; gap: 12px; }
  #log { display: grid; gap: 10px; min-height: 120px; }
  .turn { padding: 10px 12px; border-radius: 10px; white-space: pre-wrap; word-wrap: break-word; }
  .user { background: #dbe7ff; justify-self: end; max-width: 85%; }
  .answer { background: #fff; border: 1px solid var(--line); justify-self: start; max-width: 85%; }
  .answer.error { border-color: #d92d20; color: #b42318; }
  form { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px; display: grid; gap: 8px; }
  label { font-size: 13px; color: var(--muted); display: grid; gap: 3px; }
  textarea, input { font: inherit; padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px; width: 100%; }
  textarea { resize: vertical; }
  .controls { display: grid; grid-template-columns: repeat(5, 1fr); gap: 8px; }
  .buttons { display: flex; gap: 8px; align-items: center; }
  button { font: inherit; padding: 7px 16px; border-radius: 6px; border: 1px solid var(--accent); cursor: pointer; }
  #send { background: var(--accent); color: #fff; }
  #send:disabled { opacity: .5; cursor: default; }
  #reset { background: #fff; color: var(--accent); }
  #status { color: var(--muted); font-size: 13px; margin-left: auto; }
</style>
</head>
<body>
<header><h1>mlxft chat</h1><span id="model">__MODEL__</span></header>
<main>
  <div id="log" aria-live="polite"></div>
  <form id="form">
    <label>Instruction <textarea id="instruction" rows="3" placeholder="Ask something (Ctrl+Enter sends)"></textarea></label>
    <label>Input (optional) <textarea id="input" rows="2" placeholder="Context for the instruction"></textarea></label>
    <label>System prompt (optional) <input id="system" type="text"></label>
    <div class="controls">
      <label>Temperature <input id="temperature" type="number" min="0" max="2" step="any" value="0.7"></label>
      <label>Top-p <input id="top_p" type="number" min="0.01" max="1" step="any" value="1"></label>
      <label>Top-k <input id="top_k" type="number" min="0" step="1" value="0"></label>
      <label>Max tokens <input id="max_tokens" type="number" min="1" step="1" value="256"></label>
      <label>API key <input id="api_key" type="password" autocomplete="off" placeholder="if required"></label>
    </div>
    <div class="buttons">
      <button id="send" type="submit">Send</button>
      <button id="reset" type="button">Reset</button>
      <span id="status"></span>
    </div>
  </form>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let history = [];  // earlier turns, as the server renders them: instruction + input, then the answer

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function number(id, parse) {
  const value = parse($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

async function send(event) {
  event.preventDefault();
  const instruction = $("instruction").value.trim();
  if (!instruction) return;
  const input = $("input").value.trim();
  const system = $("system").value.trim();
  const user = input ? instruction + "\\n\\n" + input : instruction;
  bubble("user", user);
  const answer = bubble("answer", "");
  $("send").disabled = true;
  $("status").textContent = "generating\\u2026";
  const messages = (system ? [{role: "system", content: system}] : []).concat(history, [{role: "user", content: instruction}]);
  const body = {messages, input, stream: true, stream_options: {include_usage: true},
                temperature: number("temperature", parseFloat), top_p: number("top_p", parseFloat),
                top_k: number("top_k", parseInt), max_tokens: number("max_tokens", parseInt)};
  const headers = {"Content-Type": "application/json"};
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
  let text = "", finish = "", usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {  // one server-sent event per blank-line-ended block
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { done = true; break; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          answer.textContent = text;
          answer.scrollIntoView({block: "end"});
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    history.push({role: "user", content: user}, {role: "assistant", content: text});
    $("instruction").value = "";
    $("input").value = "";
    $("status").textContent = "done (" + (finish || "?") + (usage ? ", " + usage.completion_tokens + " tokens" : "") + ")";
    answer.dataset.done = "1";
  } catch (error) {
    answer.classList.add("error");
    answer.textContent = (text ? text + "\\n" : "") + "error: " + error.message;
    $("status").textContent = "";
    answer.dataset.done = "error";
  } finally {
    $("send").disabled = false;
  }
}

$("form").addEventListener("submit", send);
$("instruction").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});
$("reset").addEventListener("click", () => {
  history = [];
  $("log").replaceChildren();
  $("status").textContent = "conversation cleared";
});
</script>
</body>
</html>
"""


def chat_page(model_id: str) -> str:
    return PAGE.replace("__MODEL__", html.escape(model_id))
