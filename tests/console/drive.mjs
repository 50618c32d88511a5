// Drives the web console in headless Chromium for tests/console.rs:
//   node drive.mjs BASE_URL TOKEN SCREENSHOT
// Signs in (a wrong token first), checks the overview shows three queued
// messages for example.com with its primary down, holds one message, tells
// the test ("HELD <id>") and waits for a line on stdin (the primary is up),
// flushes, waits until only the held message is left, releases it, waits for
// an empty queue. Any error in the page fails the run.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [base, token, screenshot] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
let step = "start";
try {
  const page = await browser.newPage();
  // Generous: a loaded CI machine is slow, and every wait ends as soon as it holds.
  page.setDefaultTimeout(45000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("dialog", (d) => d.accept());
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`${r.status()} for ${r.url()}`); });

  step = "sign-in page";
  await page.goto(base);
  await page.waitForSelector("#sign-in:not([hidden])");
  // A wrong token is refused (its 401 is the one error the page may log).
  await page.fill("#token", "not-the-token");
  await page.click("#sign-in-form button");
  await page.waitForFunction(() => document.getElementById("status").textContent === "wrong admin token");
  if (await page.isVisible("#overview")) throw new Error("signed in with a wrong token");
  errors.length = 0;

  step = "overview";
  await page.fill("#token", token);
  await page.click("#sign-in-form button");
  await page.waitForSelector("#overview:not([hidden])");
  const row = '#domains tr[data-domain="example.com"]';
  await page.waitForFunction((sel) => {
    const cells = document.querySelector(sel)?.querySelectorAll("td");
    return cells && cells[1].textContent === "down" && cells[4].textContent === "3";
  }, row);
  step = "outage history";
  // The outage is in the history.
  await page.waitForFunction(() =>
    [...document.querySelectorAll("#history li")].some((li) => li.textContent.includes("example.com: primary down")));
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("overview: example.com down, 3 queued");

  step = "queue and hold";
  await page.click('nav a[data-view="queue"]');
  await page.waitForFunction(() => document.querySelectorAll("#messages tr").length === 3);
  const first = await page.getAttribute("#messages tr:first-child", "data-id");
  await page.click("#messages tr:first-child");
  await page.waitForFunction((id) => document.getElementById("m-id").textContent === id, first);
  if (!(await page.textContent("#m-headers")).includes("Subject:")) throw new Error("no headers shown");
  await page.click('[data-action="hold"]');
  await page.waitForFunction((id) => document.getElementById("status").textContent === `hold: ${id}`, first);
  console.log(`HELD ${first}`);
  await nextLine();

  step = "flush";
  await page.click("#flush-all");
  // The other two leave; the held one stays.
  await page.waitForFunction(async () => {
    const r = await fetch("/api/queue", { credentials: "same-origin" }).then((r) => r.json());
    return r.count === 1 && r.messages[0].held;
  }, null, { polling: 250 });
  await page.click("#filters button[type=submit]");
  await page.waitForFunction((id) => {
    const rows = document.querySelectorAll("#messages tr");
    return rows.length === 1 && rows[0].dataset.id === id;
  }, first);
  console.log("flushed: two delivered, the held one stays");

  step = "release";
  await page.click("#messages tr:first-child");
  await page.click('[data-action="release"]');
  await page.waitForFunction(async () => {
    const r = await fetch("/api/queue", { credentials: "same-origin" }).then((r) => r.json());
    return r.count === 0;
  }, null, { polling: 250 });
  console.log("released: delivered");

  if (errors.length > 0) throw new Error(`errors in the page:\n${errors.join("\n")}`);
  console.log("OK");
} catch (e) {
  console.log(`FAILED at ${step}: ${e.message}`);
  failed = true;
} finally {
  await browser.close();
  lines.close();
}
process.exit(failed ? 1 : 0);
