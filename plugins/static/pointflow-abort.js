// The Abort button of an unfinished job on the pointflow page. It asks on the page itself: the
// Airflow UI frames the page in a sandbox without allow-modals, where window.confirm shows nothing
// and answers false. The request carries the header the server requires of every change
// (CSRF_HEADER in plugins/pointflow_ui.py), which a page of another origin cannot send.
for (const box of document.querySelectorAll(".abort-box")) {
  const button = box.querySelector("button.abort");
  if (!button) continue;
  const ask = box.querySelector(".abort-confirm");
  const result = box.querySelector(".abort-result");
  const state = box.closest(".job").querySelector(".meta .state");

  function show(text, outcome) {
    result.textContent = text;
    result.dataset.state = outcome;
  }

  button.addEventListener("click", () => {
    button.hidden = true;
    ask.hidden = false;
    show("", "");
  });
  ask.querySelector(".abort-no").addEventListener("click", () => {
    ask.hidden = true;
    button.hidden = false;
  });
  ask.querySelector(".abort-yes").addEventListener("click", async () => {
    ask.hidden = true;
    show("asking…", "pending");
    let response, body;
    try {
      response = await fetch(button.dataset.url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-Pointflow-CSRF": "1" },
      });
      body = await response.json().catch(() => ({}));
    } catch {
      show("the server did not answer: try again", "refused");
      button.hidden = false;
      return;
    }
    if (response.ok) {
      show(body.message, body.state);
      state.textContent = body.state;
      state.className = `state state-${body.state}`;
      return;
    }
    const detail = typeof body.detail === "string" ? body.detail : `refused (HTTP ${response.status})`;
    show(detail, "refused");
    // Asking again helps after a passing failure, not for a job that has ended or a role that may not.
    button.hidden = response.status === 409 || response.status === 403;
  });
}
