// pgjdbc with its default settings against a masked column, run through
// the agent: prepareThreshold 5 means runs 1-4 use the unnamed statement,
// the 5th prepares a named one and describes it through a portal, and
// later runs send only Bind/Execute. Prints one line per run.
//
// usage: java -cp postgresql.jar:. JdbcMask PORT USER PASSWORD
import java.sql.*;

public class JdbcMask {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?sslmode=disable";
        StringBuilder out = new StringBuilder();
        try (Connection c = DriverManager.getConnection(url, args[1], args[2])) {
            try (PreparedStatement ps = c.prepareStatement("SELECT id, card, note FROM cards WHERE id = ?")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        out.append("card ").append(rs.getInt(1)).append('|').append(rs.getString(2))
                           .append('|').append(rs.getString(3)).append('\n');
                    }
                }
            }
            // A statement that selects no masked column, run as often.
            try (PreparedStatement ps = c.prepareStatement("SELECT note FROM cards WHERE id = ?")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        out.append("note ").append(rs.getString(1)).append('\n');
                    }
                }
            }
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT doc::text, doc FROM cards")) {
                rs.next();
                out.append("json ").append(rs.getString(2)).append('\n');
            }
        }
        System.out.print(out);
    }
}
