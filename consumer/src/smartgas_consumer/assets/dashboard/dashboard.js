// SmartGas dashboard: polls the consumer's HTTP API with the user's key and draws the fleet.
//
// The key comes from the URL fragment (#key=..., which the browser never sends to the server) or from
// localStorage; it is then removed from the address bar and sent only as the X-API-Key header. Every value
// from the API reaches the page through textContent, never as markup; charts are SVG documents rendered
// and escaped by the server (chart.py), parsed as XML and inserted as nodes. The fragment also carries the
// selected meter (#meter=bottle-0001) and, optionally, the poll interval in seconds (#poll=2).
//
// Texts that depend on the time (how long ago, how long a meter has been silent) are computed when shown
// and again every second, never taken from a message written when an alert opened. Below 1200 px the
// charts sit under the table, so selecting a meter scrolls its charts into view. Acknowledge, close and
// retire are POSTs with the same key; the API decides who may (a client key never sees a retire button).
"use strict";

(() => {
  const KEY_STORAGE = "smartgas.apiKey";
  const DEFAULT_POLL_S = 5;
  const MIN_POLL_S = 1;
  const CHART_MEASURES = ["real_moles", "moles", "pressure_bar", "fill_pct"];
  // How the fleet table's fill column names a liquefied bottle's state (the API's liquid_state).
  const LIQUID_STATES = {
    liquid_present: "liquid",
    liquid_exhausted: "liquid gone",
    over_pressure: "over-pressure",
    supercritical: "supercritical",
  };
  const NARROW = window.matchMedia("(max-width: 1200px)"); // the width at which the layout becomes one column
  const RETIRE_CONFIRM_MS = 5000;

  const $ = (selector) => document.querySelector(selector);
  const state = {
    key: null,
    meters: [],
    alerts: [],
    sort: { field: "client", descending: false },
    filter: "",
    selected: null,
    rangeS: 3600,
    scale: "bottle",
    admin: false,
    retired: null, // the meter this page retired last, to say so where its charts were
    pollMs: DEFAULT_POLL_S * 1000,
    serverOffsetMs: 0, // server clock minus browser clock, where the Date header shows they differ
    timer: null,
    inFlight: null, // the poll under way, if any
    chartGeneration: 0,
    refreshes: 0,
  };

  class AuthError extends Error {}

  // -- the key and the fragment ----------------------------------------------------------------------

  function fragment() {
    return new URLSearchParams(location.hash.replace(/^#/, ""));
  }

  function writeFragment(params) {
    params.delete("key");
    const text = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (text ? "#" + text : ""));
  }

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORAGE);
    } catch (err) {
      return null; // storage disabled: the key lives in memory for this page only
    }
  }

  function storeKey(key) {
    try {
      if (key === null) localStorage.removeItem(KEY_STORAGE);
      else localStorage.setItem(KEY_STORAGE, key);
    } catch (err) {
      /* storage disabled */
    }
  }

  function readFragment() {
    const params = fragment();
    const key = params.get("key");
    if (key) {
      state.key = key;
      storeKey(key);
    }
    const poll = Number(params.get("poll"));
    if (Number.isFinite(poll) && poll >= MIN_POLL_S) state.pollMs = poll * 1000;
    const meter = params.get("meter");
    if (meter) state.selected = meter;
    if (key) writeFragment(params); // the key leaves the address bar (and the history) at once
  }

  // -- talking to the API -----------------------------------------------------------------------------

  async function request(path, method = "GET") {
    const response = await fetch(path, { method, headers: { "X-API-Key": state.key }, cache: "no-store" });
    // The Date header counts whole seconds: trust it only where the clocks differ by more than that.
    const date = Date.parse(response.headers.get("Date") || "");
    if (Number.isFinite(date)) {
      const offset = date + 500 - Date.now();
      state.serverOffsetMs = Math.abs(offset) > 1500 ? offset : 0;
    }
    if (response.status === 401) throw new AuthError("the key was refused");
    if (!response.ok) {
      let detail = "";
      try {
        const body = await response.json();
        if (typeof body.detail === "string") detail = `: ${body.detail}`;
      } catch (err) {
        /* not JSON: the status says enough */
      }
      throw new Error(`${path.split("?")[0]} answered ${response.status}${detail}`);
    }
    return response;
  }

  const getJson = async (path) => (await request(path)).json();
  const serverNow = () => Date.now() + state.serverOffsetMs;

  // -- formatting ------------------------------------------------------------------------------------

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  // When an offline meter fell silent: its last reading as the registry knows it, else what the alert
  // recorded (opened at, after `value` seconds of silence).
  function silentSince(alert) {
    const meter = state.meters.find((m) => m.meter_id === alert.meter_id);
    if (meter && meter.last_seen) return Date.parse(meter.last_seen);
    if (typeof alert.value === "number") return Date.parse(alert.opened_at) - alert.value * 1000;
    return null;
  }

  function silenceText(sinceMs) {
    return `no reading for ${duration((serverNow() - sinceMs) / 1000)} (last at ${new Date(sinceMs).toLocaleString()})`;
  }

  const number = (value, digits) => (value === null || value === undefined ? "–" : value.toFixed(digits));

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- the fleet table -------------------------------------------------------------------------------

  const SORT_KEYS = {
    meter_id: (m) => [m.meter_id],
    client: (m) => [m.client_name || m.client_id || "~", m.site_name || m.site_id || "~", m.meter_id],
    site: (m) => [m.site_name || m.site_id || "~", m.meter_id],
    gas: (m) => [m.gas || "~", m.meter_id],
    fill_pct: (m) => [m.fill_pct ?? -1, m.meter_id],
    pressure_bar: (m) => [m.pressure_bar ?? -1, m.meter_id],
    last_seen: (m) => [m.last_seen || "", m.meter_id],
    online: (m) => [m.online ? 2 : m.registered ? 1 : 0, m.meter_id],
    open_alerts: (m) => [m.open_alerts, m.meter_id],
    // Fewest days first; bottles with no figure (liquefied, unknown, never seen) after every figure.
    days_to_empty: (m) => [m.forecast && m.forecast.days_to_empty !== null ? m.forecast.days_to_empty : Infinity, m.meter_id],
  };

  // The fleet table's days-to-empty cell: the figure (with its basis as a tooltip), or why there is none.
  function daysCell(meter) {
    const forecast = meter.forecast;
    const days = forecast ? forecast.days_to_empty : null;
    let text = "–";
    if (days !== null && days !== undefined) text = days < 1 ? "< 1 d" : `${number(days, days < 10 ? 1 : 0)} d`;
    else if (meter.gas_storage === "liquefied") text = LIQUID_STATES[meter.liquid_state] || "liquefied";
    const cell = element("td", "num days", text);
    if (forecast) {
      cell.title = forecast.note;
      if (forecast.basis) cell.dataset.basis = forecast.basis;
    }
    if (days !== null && days !== undefined && days < 3) cell.classList.add("soon");
    return cell;
  }

  function compare(a, b) {
    for (let i = 0; i < a.length; i += 1) {
      if (a[i] < b[i]) return -1;
      if (a[i] > b[i]) return 1;
    }
    return 0;
  }

  function visibleMeters() {
    const key = SORT_KEYS[state.sort.field];
    const needle = state.filter.toLowerCase();
    const shown = state.meters.filter((m) =>
      [m.meter_id, m.client_name, m.client_id, m.site_name, m.site_id, m.gas]
        .some((text) => text && text.toLowerCase().includes(needle)));
    shown.sort((a, b) => compare(key(a), key(b)) * (state.sort.descending ? -1 : 1));
    return shown;
  }

  function cells(meter) {
    const row = document.createElement("tr");
    row.dataset.meter = meter.meter_id;
    row.tabIndex = 0;
    row.setAttribute("aria-selected", String(meter.meter_id === state.selected));
    if (!meter.registered) row.classList.add("unregistered");

    row.append(element("td", "meter", meter.meter_id));
    const client = element("td", "client", meter.client_name || meter.client_id || "unknown");
    const site = element("td", "site", meter.site_name || meter.site_id || "–");
    client.title = client.textContent; // the full name, where the column cuts it short
    site.title = site.textContent;
    row.append(client, site);
    row.append(element("td", "gas", meter.gas || "–"));

    const fill = element("td", "num");
    const box = element("div", "fill");
    const bar = element("div", "bar");
    const level = element("div", "bar-fill");
    if (meter.fill_pct !== null) {
      const pct = Math.max(0, Math.min(100, meter.fill_pct));
      level.style.width = `${pct}%`; // CSSOM, which the page's CSP allows (a style attribute it would not)
      if (pct < 10) level.classList.add("empty");
      else if (pct < 25) level.classList.add("low");
    }
    bar.append(level);
    bar.hidden = meter.fill_pct === null;
    // A liquefied gas has no fill % from pressure: its liquid state instead (docs/physics.md).
    const fillText = meter.fill_pct !== null ? `${number(meter.fill_pct, 0)} %` : LIQUID_STATES[meter.liquid_state] || "–";
    box.append(bar, element("span", "fill-value", fillText));
    fill.append(box);
    row.append(fill);

    row.append(daysCell(meter));
    row.append(element("td", "num pressure", meter.pressure_bar === null ? "–" : `${number(meter.pressure_bar, 1)} bar`));
    const seen = element("td", "ago", ago(meter.last_seen));
    seen.dataset.when = meter.last_seen || "";
    if (meter.last_seen) seen.title = meter.last_seen;
    row.append(seen);

    const stateCell = element("td", "state");
    const label = meter.online ? "online" : meter.registered ? "offline" : "never seen";
    stateCell.append(element("span", `pill ${meter.online ? "online" : meter.registered ? "offline" : "never"}`, label));
    row.append(stateCell);

    const alerts = element("td", "num");
    alerts.append(element("span", `badge ${meter.open_alerts ? "some" : ""}`, String(meter.open_alerts)));
    row.append(alerts);
    if (!meter.registered) row.querySelectorAll("td").forEach((td) => td.classList.add("unseen"));
    return row;
  }

  function renderTable() {
    const body = $("#fleet tbody");
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.meter : undefined;
    const rows = [];
    let previousGroup = null;
    for (const meter of visibleMeters()) {
      const row = cells(meter);
      const group = state.sort.field === "client" ? meter.client_id : null;
      if (group !== null && previousGroup !== null && group !== previousGroup) row.classList.add("group-start");
      previousGroup = group;
      rows.push(row);
    }
    body.replaceChildren(...rows);
    if (focused) {
      const again = body.querySelector(`tr[data-meter="${CSS.escape(focused)}"]`);
      if (again) again.focus({ preventScroll: true });
    }
    document.querySelectorAll("#fleet th[data-sort]").forEach((th) => {
      const sorted = th.dataset.sort === state.sort.field;
      if (sorted) th.setAttribute("aria-sort", state.sort.descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
  }

  function renderCards() {
    const online = state.meters.filter((m) => m.online).length;
    const never = state.meters.filter((m) => !m.registered).length;
    $("#count-meters").textContent = String(state.meters.length);
    $("#count-online").textContent = String(online);
    $("#count-offline").textContent = String(state.meters.length - online - never);
    $("#count-never").textContent = String(never);
    $("#count-alerts").textContent = String(state.alerts.length);
    $(".card-alerts").classList.toggle("has-alerts", state.alerts.length > 0);
  }

  function renderAlerts() {
    const items = state.alerts.map((alert) => {
      const item = element("li");
      item.dataset.meter = alert.meter_id;
      item.dataset.alert = alert.alert_id;
      const head = element("div", "alert-head");
      const age = element("span", "alert-age", ago(alert.opened_at));
      age.dataset.when = alert.opened_at;
      age.title = `opened ${alert.opened_at}`;
      head.append(
        element("span", `severity ${alert.severity}`, alert.severity),
        element("span", "alert-kind", alert.kind),
        element("span", "alert-meter", alert.meter_id),
        age,
      );
      const message = element("div", "alert-message", alert.message);
      const since = alert.kind === "offline" ? silentSince(alert) : null;
      if (since !== null && Number.isFinite(since)) {
        message.dataset.silentSince = String(since);
        message.textContent = silenceText(since);
        message.title = alert.message;
      }
      const actions = element("div", "alert-actions");
      if (alert.acknowledged_at) {
        const seen = element("span", "acknowledged", `acknowledged by ${alert.acknowledged_by}`);
        seen.title = alert.acknowledged_at;
        actions.append(seen);
      } else {
        actions.append(actionButton("acknowledge", "Acknowledge"));
      }
      actions.append(actionButton("close", "Close"));
      item.classList.toggle("is-acknowledged", Boolean(alert.acknowledged_at));
      item.append(head, message, actions);
      return item;
    });
    $("#alerts").replaceChildren(...items);
    $("#no-alerts").hidden = items.length > 0;
  }

  function actionButton(action, label) {
    const button = element("button", "action", label);
    button.type = "button";
    button.dataset.action = action;
    return button;
  }

  function tickAges() {
    document.querySelectorAll("#fleet td.ago, #alerts .alert-age").forEach((node) => {
      node.textContent = ago(node.dataset.when || null);
    });
    document.querySelectorAll("#alerts .alert-message[data-silent-since]").forEach((node) => {
      node.textContent = silenceText(Number(node.dataset.silentSince));
    });
  }

  async function actOnAlert(alertId, action) {
    let problem = null;
    try {
      await request(`/api/alerts/${encodeURIComponent(alertId)}/${action}`, "POST");
    } catch (err) {
      if (err instanceof AuthError) return failed(err);
      problem = err;
    }
    await refresh();
    if (problem) setStatus(`Could not ${action} the alert: ${problem.message}`, true);
  }

  // -- the selected meter ----------------------------------------------------------------------------

  function renderFacts() {
    const meter = state.meters.find((m) => m.meter_id === state.selected);
    $("#meter-title").textContent = state.selected ? `Meter ${state.selected}` : "Select a meter";
    const retire = $("#retire");
    retire.hidden = !(state.admin && meter);
    if (retire.dataset.armed !== state.selected) disarmRetire();
    if (!meter) {
      let text = "Click a row of the table to see its readings over time.";
      if (state.selected && state.selected === state.retired) text = "This meter is retired: it left the table; its readings stay in the API.";
      else if (state.selected) text = "This meter is not in your fleet.";
      $("#meter-facts").textContent = text;
      return;
    }
    const parts = [
      meter.client_name || meter.client_id || "unknown client",
      meter.site_name || meter.site_id || "unknown site",
      meter.gas ? `${meter.gas}, ${meter.volume_l} L` : null,
      `${meter.readings} readings`,
      meter.moles === null ? null : `${number(meter.moles, 1)} mol`,
      meter.temperature_c === null ? null : `${number(meter.temperature_c, 1)} °C`,
      meter.gaps ? `${meter.gaps} missing` : null,
      meter.reboots ? `${meter.reboots} restarts` : null,
      meter.forecast ? forecastFact(meter.forecast) : null,
    ];
    $("#meter-facts").textContent = parts.filter(Boolean).join(" · ");
  }

  function forecastFact(forecast) {
    if (forecast.days_to_empty === null) return forecast.note;
    const until = `reserve (${number(forecast.reserve_fill_pct, 0)} %) in ${number(forecast.days_to_empty, 1)} days`;
    return `${until} at ${number(forecast.consumption_mol_per_day, 1)} mol/day (${forecast.basis})`;
  }

  function disarmRetire() {
    const retire = $("#retire");
    delete retire.dataset.armed;
    retire.textContent = "Retire meter";
    retire.classList.remove("armed");
  }

  // Two clicks retire: the first arms the button for a few seconds and says what the second will do.
  async function retireSelected() {
    const retire = $("#retire");
    const meterId = state.selected;
    if (!meterId) return;
    if (retire.dataset.armed !== meterId) {
      retire.dataset.armed = meterId;
      retire.textContent = `Confirm: retire ${meterId}`;
      retire.classList.add("armed");
      setTimeout(() => { if (retire.dataset.armed === meterId) disarmRetire(); }, RETIRE_CONFIRM_MS);
      return;
    }
    disarmRetire();
    let problem = null;
    try {
      await request(`/api/meters/${encodeURIComponent(meterId)}/retire`, "POST");
      state.retired = meterId;
      document.querySelectorAll(".chart-box").forEach((box) => box.replaceChildren());
    } catch (err) {
      if (err instanceof AuthError) return failed(err);
      problem = err;
    }
    await refresh();
    if (problem) setStatus(`Could not retire ${meterId}: ${problem.message}`, true);
  }

  async function loadCharts() {
    if (!state.selected || !state.meters.some((m) => m.meter_id === state.selected)) return;
    const generation = ++state.chartGeneration;
    const since = new Date(serverNow() - state.rangeS * 1000).toISOString();
    const meter = encodeURIComponent(state.selected);
    await Promise.all(CHART_MEASURES.map(async (measure) => {
      const box = document.querySelector(`.chart-box[data-measure="${measure}"]`);
      let node;
      try {
        const params = new URLSearchParams({ measure, since, scale: state.scale });
        const text = await (await request(`/dashboard/api/meters/${meter}/chart.svg?${params}`)).text();
        const parsed = new DOMParser().parseFromString(text, "image/svg+xml");
        const root = parsed.documentElement;
        if (root.localName !== "svg" || parsed.getElementsByTagName("parsererror").length) {
          throw new Error("the chart could not be read");
        }
        node = document.importNode(root, true);
      } catch (err) {
        if (err instanceof AuthError) throw err;
        node = element("p", "error", `${measure}: ${err.message}`);
      }
      if (generation === state.chartGeneration) box.replaceChildren(node);
    }));
  }

  function select(meterId) {
    if (meterId === state.selected) return;
    state.selected = meterId;
    const params = fragment();
    params.set("meter", meterId);
    writeFragment(params);
    document.querySelectorAll("#fleet tbody tr").forEach((row) => {
      row.setAttribute("aria-selected", String(row.dataset.meter === meterId));
    });
    document.querySelectorAll(".chart-box").forEach((box) => box.replaceChildren());
    renderFacts();
    // One column: the charts are under the whole table, out of sight; bring them to where the user looks,
    // and again once they are drawn (until then the page may be too short to bring them to the top).
    const reveal = () => {
      if (NARROW.matches && state.selected === meterId) $("#meter-panel").scrollIntoView({ block: "start" });
    };
    if (NARROW.matches) {
      reveal();
      $("#meter-title").focus({ preventScroll: true });
    }
    loadCharts().then(reveal).catch(failed);
  }

  // -- the loop --------------------------------------------------------------------------------------

  function setStatus(text, isError) {
    const status = $("#status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function failed(err) {
    if (err instanceof AuthError) {
      showLogin("That key was refused. Enter a valid key.");
      return;
    }
    setStatus(`Cannot reach the consumer: ${err.message}. Retrying…`, true);
  }

  // One poll at a time: a refresh asked for while one runs waits for it, then polls again (fresh data after
  // an action), and only the last poll arms the timer.
  async function refresh() {
    if (state.inFlight) await state.inFlight.catch(() => {});
    if (!state.inFlight) state.inFlight = poll().finally(() => { state.inFlight = null; });
    return state.inFlight;
  }

  async function poll() {
    clearTimeout(state.timer);
    try {
      const [meters, alerts] = await Promise.all([getJson("/api/meters"), getJson("/api/alerts?state=open")]);
      state.meters = meters.meters;
      state.alerts = alerts.alerts;
      renderTable();
      renderCards();
      renderAlerts();
      renderFacts();
      await loadCharts();
      state.refreshes += 1;
      document.body.dataset.refreshes = String(state.refreshes);
      const time = new Date(serverNow()).toLocaleTimeString();
      setStatus(`Updated ${time} · every ${state.pollMs / 1000} s`, false);
    } catch (err) {
      failed(err);
      if (err instanceof AuthError) return;
    }
    state.timer = setTimeout(refresh, state.pollMs);
  }

  async function open() {
    $("#login").hidden = true;
    setStatus("Loading…", false);
    try {
      const me = await getJson("/api/me");
      state.admin = me.admin;
      $("#who").textContent = me.admin ? "administrator" : `client ${me.client_id}`;
    } catch (err) {
      failed(err);
      return;
    }
    $("#forget").hidden = false;
    $("#main").hidden = false;
    refresh();
  }

  function showLogin(message) {
    clearTimeout(state.timer);
    state.key = null;
    storeKey(null);
    $("#main").hidden = true;
    $("#forget").hidden = true;
    $("#who").textContent = "";
    $("#login").hidden = false;
    $("#login-error").textContent = message || "";
    setStatus("Not signed in", false);
    $("#key-input").focus();
  }

  function wire() {
    $("#login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("#key-input").value.trim();
      if (!key) return;
      $("#key-input").value = "";
      state.key = key;
      storeKey(key);
      open();
    });
    $("#forget").addEventListener("click", () => showLogin(""));
    $("#fleet thead").addEventListener("click", (event) => {
      const th = event.target.closest("th[data-sort]");
      if (!th) return;
      const field = th.dataset.sort;
      state.sort = { field, descending: state.sort.field === field ? !state.sort.descending : false };
      renderTable();
    });
    $("#fleet tbody").addEventListener("click", (event) => {
      const row = event.target.closest("tr[data-meter]");
      if (row) select(row.dataset.meter);
    });
    $("#fleet tbody").addEventListener("keydown", (event) => {
      const row = event.target.closest("tr[data-meter]");
      if (row && (event.key === "Enter" || event.key === " ")) {
        event.preventDefault();
        select(row.dataset.meter);
      }
    });
    $("#alerts").addEventListener("click", (event) => {
      const item = event.target.closest("li[data-meter]");
      if (!item) return;
      const button = event.target.closest("button[data-action]");
      if (button) {
        button.disabled = true;
        actOnAlert(item.dataset.alert, button.dataset.action);
        return;
      }
      select(item.dataset.meter);
    });
    $("#retire").addEventListener("click", () => { retireSelected(); });
    $("#scale").addEventListener("change", (event) => {
      state.scale = event.target.value;
      loadCharts().catch(failed);
    });
    $("#filter").addEventListener("input", (event) => {
      state.filter = event.target.value;
      renderTable();
    });
    $("#range").addEventListener("change", (event) => {
      state.rangeS = Number(event.target.value);
      loadCharts().catch(failed);
    });
    window.addEventListener("hashchange", () => {
      const hadKey = fragment().has("key");
      readFragment();
      if (hadKey) {
        open();
      } else if (state.key) {
        renderTable();
        renderFacts();
        loadCharts().catch(failed);
      }
    });
    setInterval(tickAges, 1000);
  }

  function start() {
    wire();
    readFragment();
    if (!state.key) state.key = storedKey();
    if (state.key) open();
    else showLogin("");
  }

  start();
})();
