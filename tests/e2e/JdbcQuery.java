import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;

/**
 * pgjdbc run as an application would: connects to URL as USER with
 * PASSWORD, runs SQL and prints each row's columns joined by '|'.
 *
 * usage: java -cp postgresql.jar JdbcQuery.java URL USER PASSWORD SQL
 */
public class JdbcQuery {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2]);
                Statement st = c.createStatement();
                ResultSet rs = st.executeQuery(args[3])) {
            int n = rs.getMetaData().getColumnCount();
            while (rs.next()) {
                StringBuilder row = new StringBuilder();
                for (int i = 1; i <= n; i++) {
                    if (i > 1) {
                        row.append('|');
                    }
                    row.append(rs.getString(i));
                }
                System.out.println(row);
            }
        }
    }
}
