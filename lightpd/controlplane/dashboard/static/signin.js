// Posts the admin token in a JSON body; the answer sets an HttpOnly session cookie.
const form = document.getElementById("signin");
const error = document.getElementById("signin-error");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const reply = await fetch("/dashboard/session", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: form.token.value }),
      credentials: "same-origin",
    });
    if (reply.ok) {
      window.location.replace("/dashboard");
      return;
    }
    error.textContent =
      reply.status === 401 ? "Wrong admin token." : `Sign-in failed (HTTP ${reply.status}).`;
  } catch (exc) {
    error.textContent = `Cannot reach the control plane: ${exc}`;
  } finally {
    button.disabled = false;
  }
  error.hidden = false;
  form.token.select();
});
