// One onboarding journey per user through @segment/analytics-node, pointed at stream-app collector.
// usage: node node_client.js HOST WRITE_KEY USERS PREFIX   -> prints {"sent": n, "errors": [...]}
const { Analytics } = require('@segment/analytics-node')

const [host, writeKey, users, prefix] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 20, flushInterval: 200, maxRetries: 5 })
const errors = []
analytics.on('error', (err) => errors.push(String(err && (err.reason || err.code || err))))
const steps = ['account', 'profile', 'connect_data']
let sent = 0
for (let i = 0; i < Number(users); i++) {
  const userId = `${prefix}-${i}`
  const anonymousId = `anon-${prefix}-${i}`
  analytics.page({ anonymousId, name: 'Landing', properties: { path: '/' } })
  analytics.identify({ userId, anonymousId, traits: { plan: 'pro', role: 'developer' } })
  for (const step of steps) {
    analytics.track({ userId, event: 'Onboarding Step Started', properties: { flow: 'signup', step } })
    analytics.track({ userId, event: 'Onboarding Step Completed', properties: { flow: 'signup', step } })
  }
  analytics.screen({ userId, name: 'Home' })
  analytics.group({ userId, groupId: 'acme-1', traits: { plan: 'team' } })
  analytics.alias({ previousId: `old-${userId}`, userId })
  sent += 2 + 2 * steps.length + 3
}
analytics.closeAndFlush({ timeout: 60000 }).then(() => {
  process.stdout.write(JSON.stringify({ sent, errors }) + '\n')
})
