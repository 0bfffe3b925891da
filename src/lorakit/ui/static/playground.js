// The Playground view: chat with the base model or an adapter (the picker lists /v1/models), one pane
// or two side by side (the same prompt to both), tokens streamed from /v1/chat/completions (SSE).
// Each pane keeps its own conversation; temperature 0 is greedy (the server's argmax).
"use strict";
(() => {
  const state = {models: [], panes: [{history: []}, {history: []}], loaded: false, sending: 0};
  const $ = (id) => document.getElementById(id);
  const pane = (i) => $("pane-" + i);

  async function load() {
    const body = await LK.read(await fetch("/v1/models", {headers: LK.headers()}));
    state.models = body.data.map((m) => m.id);
    for (let i = 0; i < 2; i++) {
      const sel = pane(i).querySelector(".picker");
      sel.textContent = "";
      state.models.forEach((id, k) => sel.append(LK.el("option", {value: id},
        k === 0 ? id + " (base)" : id + " (adapter)")));
      sel.value = state.models[Math.min(i, state.models.length - 1)];
      sel.addEventListener("change", () => clear(i));
    }
    $("play-note").textContent = `${state.models.length - 1} adapter${state.models.length === 2 ? "" : "s"} on ${state.models[0]}`;
  }

  function clear(i) {
    state.panes[i].history = [];
    pane(i).querySelector(".transcript").textContent = "";
  }

  const active = () => $("side-by-side").checked ? [0, 1] : [0];

  function send(event) {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.sending) return;
    $("prompt").value = "";
    for (const i of active()) {
      const p = state.panes[i];
      p.history.push({role: "user", content: text});
      const log = pane(i).querySelector(".transcript");
      log.append(LK.el("div", {class: "msg user"}, text));
      const bubble = LK.el("div", {class: "msg assistant", "data-chunks": "0"});
      log.append(bubble);
      stream(i, bubble);
    }
  }

  // POST the pane's conversation with stream: true; append each delta to the bubble as it arrives.
  async function stream(i, bubble) {
    const p = state.panes[i], model = pane(i).querySelector(".picker").value;
    const body = {model, messages: p.history, stream: true, stream_options: {include_usage: true},
      max_tokens: Number($("max-tokens").value) || 64, temperature: Number($("temperature").value) || 0};
    const text = LK.el("span", {class: "text"}), meta = LK.el("span", {class: "meta"}, model + " …");
    bubble.append(text, meta);
    state.sending++; $("send").disabled = true;
    const t0 = performance.now();
    let answer = "", chunks = 0, usage = null, finish = null;
    try {
      const resp = await fetch("/v1/chat/completions", {method: "POST",
        headers: LK.headers({"Content-Type": "application/json"}), body: JSON.stringify(body)});
      if (!resp.ok) await LK.read(resp);  // throws the server's message
      const reader = resp.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (!data || data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          const choice = (msg.choices || [])[0];
          if (!choice) continue;
          if (choice.finish_reason) finish = choice.finish_reason;
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            answer += delta; chunks++;
            text.textContent = answer;
            bubble.dataset.chunks = String(chunks);
            bubble.parentNode.scrollTop = bubble.parentNode.scrollHeight;
          }
        }
      }
      p.history.push({role: "assistant", content: answer});
      const s = (performance.now() - t0) / 1000;
      const n = usage ? usage.completion_tokens : chunks;
      meta.textContent = `${model} · ${n} tokens in ${s.toFixed(2)} s (${(n / s).toFixed(1)} tokens/s) · ${finish || ""}`;
      bubble.dataset.finish = finish || "";
    } catch (e) {
      bubble.classList.add("error");
      meta.textContent = model + ": " + e.message;
      p.history.pop();  // the question that failed is not part of the conversation
    } finally {
      bubble.dataset.done = "1";
      state.sending--; $("send").disabled = state.sending > 0;
    }
  }

  LK.views.playground = {
    open: async () => {
      if (!LK.info.model) {
        $("play-off").hidden = false; $("play-on").hidden = true;
        $("play-off").textContent = LK.info.playground;
        return;
      }
      $("play-off").hidden = true; $("play-on").hidden = false;
      if (state.loaded) return;
      state.loaded = true;
      try { await load(); } catch (e) { state.loaded = false; LK.problem(e.message); return; }
      $("prompt-form").addEventListener("submit", send);
      $("prompt").addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("prompt-form").requestSubmit(); }
      });
      $("side-by-side").addEventListener("change", () => { pane(1).hidden = !$("side-by-side").checked; });
      $("clear").addEventListener("click", () => { clear(0); clear(1); });
    },
    state,
  };
})();
